"""TrainConfig: every knob of a pretraining run, read from a TOML/YAML file and/or flags.

Precedence: dataclass defaults < config file < command line. The file uses the field names
below (dashes or underscores); unknown keys are an error, so a typo never goes unnoticed.
On `--resume` the run's saved settings replace the defaults (see `resume_config`).

`RunConfig` is what every run's config shares (pretraining here; SFT and GRPO in
nanoseek.posttrain): the file/flags precedence, the budget, and what `--resume` may change.
A run config is a dataclass subclassing it with the fields `out`, `steps`, `tokens`,
`minutes`, `resume` and `overwrite`, and an `IDENTITY` tuple.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from nanoseek.train.budget import Budget

OPTIMIZER_STATES = ("fp32", "bf16")  # AdamW's moments (train/adamw.py: bf16)
MAX_BF16_BETA2 = 0.99  # bf16's 8-bit mantissa swallows the second moment's updates above this
DECAY_SHAPES = ("linear", "sqrt")  # wsd's decay: train/schedule.py

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class TrainError(ValueError):
    """A run that cannot start or continue; the message names the problem and the fix."""


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


Config = TypeVar("Config", bound="RunConfig")


class RunConfig:
    """The methods every run config shares; its dataclass subclasses hold the fields."""

    # What a run computes. A resumed run takes these from its checkpoint; a flag that changes
    # one is an error, since the result would silently be neither the old run nor a clean new
    # one.
    IDENTITY: ClassVar[tuple[str, ...]] = ()
    # How this launch spreads the run over its processes: never taken from the saved
    # settings, so a run saved on N ranks resumes on M with the defaults (or new flags).
    LAYOUT: ClassVar[tuple[str, ...]] = ("parallel", "ep")
    given: frozenset[str] | None  # the fields given explicitly (file or flags)

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        fields = config_fields(type(self))
        return {k: v for k, v in dataclasses.asdict(self).items() if k in fields}

    def given_fields(self) -> set[str]:
        if self.given is not None:
            return set(self.given)
        fields = config_fields(type(self))
        return {k for k, f in fields.items() if getattr(self, k) != _default(f)}

    def budget(self) -> Budget:
        """The budget the run stops at."""
        return Budget(self.steps, self.tokens, self.minutes)


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The settings of a config class (not the internal `given`)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


@dataclass
class TrainConfig(RunConfig):
    # what to train, on what, where
    preset: str = _h("model preset (tiny, small, dense-small, ...)", default="small")
    data: str = _h(
        "token shard dir (from `nanoseek data prepare`), or a corpus to prepare: "
        "'stdlib', a directory, a file or a glob",
        default="stdlib",
    )
    data_dir: str | None = _h(
        "where to build shards when --data is a corpus (default: OUT/data)", default=None
    )
    vocab_size: int = _h("tokenizer vocabulary when the data has to be prepared", default=8192)
    out: str = _h(
        "run directory: checkpoint, metrics.jsonl, loss.png, summary.json", default="runs/default"
    )
    # budget: the run stops at whichever comes first; the LR schedule follows the same fraction
    steps: int | None = _h("optimizer steps", default=None)
    tokens: float | None = _h("training tokens (e.g. 2e6)", default=None)
    minutes: float | None = _h("wall-clock minutes", default=None)
    # batch
    batch_size: int = _h(
        "sequences per micro-batch, over all ranks (each of N processes takes batch_size / N)",
        default=8,
    )
    seq_len: int = _h("tokens per sequence", default=256)
    grad_accum: int = _h("micro-batches per optimizer step", default=1)
    batch_ramp: float = _h(
        "tokens over which the batch grows from --batch-start to --batch-size in steps of "
        "--batch-start (DeepSeek-V3 grew 3072 to 15360 sequences over its first 469B tokens): "
        "early on, more steps beat bigger ones. 0: --batch-size throughout",
        default=0.0,
    )
    batch_start: int | None = _h(
        "the first batch size of a --batch-ramp (sequences per micro-batch, over all ranks)",
        default=None,
    )
    # optimizer and schedule
    lr: float = _h(
        "peak learning rate (1.5e-3 beat 3e-3 for `small` and `dense-small` at 800K tokens "
        "on two seeds: README, MoE versus dense)",
        default=1.5e-3,
    )
    min_lr_ratio: float = _h("final LR as a fraction of the peak", default=0.1)
    warmup_steps: int = _h("linear warm-up steps", default=20)
    schedule: str = _h(
        "wsd (warmup-stable-decay: the peak LR until the last --decay-frac, then linear to the "
        "floor) or cosine. wsd ended 0.11-0.15 lower for `small` and `dense-small` at 800K "
        "tokens: cosine's long low-LR tail slows a run that is still learning fast",
        default="wsd",
    )
    decay_frac: float = _h("wsd: the final fraction of the run that decays", default=0.2)
    decay_shape: str = _h(
        "wsd: the decay's shape, linear or sqrt (1 - sqrt(x) over the decay's progress x: "
        "lower sooner, then slower; Hägele et al. 2024 found it ended lower than linear; on "
        "the 128-wide MoE's decay branches it ended level)",
        default="linear",
    )
    optimizer: str = _h(
        "adamw, or muon (Muon for the blocks' weight matrices, experts included; AdamW for "
        "embeddings, head, router and norms; the same --lr and schedule)",
        default="adamw",
    )
    weight_decay: float = _h("AdamW weight decay (matrices only)", default=0.1)
    expert_weight_decay: float | None = _h(
        "weight decay of the routed experts alone (default: --weight-decay)",
        default=None,
    )
    beta1: float = _h("AdamW beta1", default=0.9)
    beta2: float = _h("AdamW beta2", default=0.95)
    expert_beta2: float | None = _h(
        "AdamW beta2 of the routed experts alone (default: --beta2): their second moment "
        "apart from the rest's (at beta2 0.99 the MoE fell behind either way, with the "
        "experts at 0.95 or the rest: docs/benchmarks.md)",
        default=None,
    )
    optim_states: str = _h(
        "fp32, or bf16: AdamW's moments stored in bf16 (DeepSeek-V3's recipe: half the "
        "optimizer memory and traffic; needs beta2 <= 0.99)",
        default="fp32",
    )
    grad_clip: float = _h("clip the gradient norm to this (0: off)", default=1.0)
    # DeepSeek-V3 specifics
    mtp_weight: float = _h("multi-token-prediction loss weight (lambda)", default=0.3)
    gamma: float = _h("expert-bias update speed at the start of the run", default=0.01)
    gamma_final: float = _h(
        "expert-bias update speed at the end (linear from --gamma over --gamma-tokens)",
        default=0.001,
    )
    gamma_tokens: float = _h(
        "tokens over which the bias speed falls from --gamma to --gamma-final (0: the whole "
        "budget). A fixed count keeps the MoE's routing recipe the same whatever the budget: "
        "under wsd a longer run then repeats a shorter one's curve up to the shorter one's "
        "decay (over the budget, a 60M-token run's bias moved faster than a 30M one's and its "
        "curve parted from it by up to 0.15 nats: docs/benchmarks.md). Too short a fall "
        "costs the MoE its lead: at 24M tokens a fall over 12M lost it by 12M, one over 24M "
        "kept it (0.09 nats, seed 0), one over 48M was behind that by 0.02-0.08 at 6-10M "
        "on both seeds",
        default=0.0,
    )
    gamma_decay: float | None = _h(
        "expert-bias update speed while a wsd run's LR decays (DeepSeek-V3 set it to 0 for its "
        "last 500B tokens: the routing holds still while the model settles); default: the "
        "--gamma schedule goes on. A decay branch may change it. Measured: 0 lowered a 24M-token "
        "MoE's decayed loss by 0.001 on two seeds",
        default=None,
    )
    alpha: float = _h("sequence-wise balance loss weight (0: off)", default=0.0)
    router_lr: float = _h(
        "the MoE routers' learning rate as a fraction of --lr (their weights move the choice of "
        "experts for every token: at the full rate they outrun the balancing bias early on)",
        default=0.1,
    )
    expert_lr: float = _h(
        "the routed experts' learning rate as a fraction of --lr (each sees only its top-k "
        "share of the tokens; on the 128-wide MoE 0.5 and 2 both ended higher once decayed)",
        default=1.0,
    )
    indexer_warmup_steps: int = _h(
        "V3.2 models: before training, this many steps train only the lightning indexers, by "
        "KL to the dense attention (one process)",
        default=0,
    )
    indexer_loss_weight: float = _h(
        "V3.2 models, after the warm-up: weight of the indexers' KL to the main attention over "
        "the keys they select, added to the loss (it reaches only the indexers; 0: frozen)",
        default=1.0,
    )
    # evaluation, checkpoints, logging
    eval_every: int = _h("evaluate every N steps (0: only at the end)", default=100)
    eval_batches: int = _h("validation batches per evaluation", default=8)
    save_every: int = _h("checkpoint every N steps (0: only at the end)", default=0)
    keep_every: int = _h(
        "also keep the checkpoint every N steps, as OUT/ckpt-<step> (whole copies): where "
        "--decay-from branches start (0: none)",
        default=0,
    )
    log_every: int = _h("write metrics every N steps", default=1)
    max_bad_steps: int = _h("stop after this many non-finite losses in a row", default=5)
    # machine
    seed: int = _h("random seed (weights and batches)", default=0)
    device: str = _h("auto, cpu, cuda, cuda:1, ...", default="auto")
    dtype: str = _h("auto (bf16 where the hardware has it), bf16 or fp32", default="auto")
    compile: bool = _h("torch.compile the model", default=False)
    threads: int | None = _h("CPU threads (default: torch's choice)", default=None)
    parallel: str = _h(
        "under torchrun: fsdp (FSDP2: parameters, gradients and optimizer state sharded over the "
        "ranks) or ddp (each rank holds them all)",
        default="fsdp",
    )
    ep: int = _h(
        "under torchrun: split the routed experts over this many ranks (expert parallelism; "
        "must divide the number of processes)",
        default=1,
    )
    resume: bool = _h(
        "continue from OUT/ckpt exactly where it stopped, with the settings the run was started "
        "with (OUT/train_config.json). Flags may change the budget, evaluation/checkpoint/log "
        "cadence, --grad-clip and the machine (device, dtype, threads, compile), but not what "
        "the run computes (batch, seed, LR schedule, model, data, MTP, balancing): that is an "
        "error. A new budget moves where the run stops; its LR schedule keeps the original "
        "horizon (past it the LR stays at its final value), except a wsd run at its peak LR "
        "under both budgets (and a MoE's bias speed fixed by --gamma-tokens), which then "
        "decays as a run of the new budget would",
        default=False,
    )
    decay_from: str | None = _h(
        "a decay branch: a new run in --out that goes on from this checkpoint of a wsd run at "
        "its peak LR (e.g. RUN/ckpt-0004000, kept by --keep-every), with its settings, and "
        "decays the LR from there as the run whose decay starts at that checkpoint would (its "
        "budget: the checkpoint's steps or tokens / (1 - --decay-frac)). One stable run then "
        "gives the decayed loss at several budgets, each for the cost of its decay; keep the "
        "bias speed's fall fixed in tokens (--gamma-tokens) so the stable phase does not "
        "depend on the budget",
        default=None,
    )
    overwrite: bool = _h("start afresh even if OUT already holds a checkpoint", default=False)
    progress: bool = _h("show a progress bar", default=True)
    model: dict[str, Any] = _h(
        "ModelConfig fields overriding the preset (config file only)", default_factory=dict
    )
    # Not a setting: the fields given explicitly (file or flags), set by make_config, so that
    # --resume can tell a deliberate flag from a default. None: those that differ from it.
    given: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def batch_at(self, tokens: float) -> int:
        """The batch (sequences per micro-batch, over all ranks) of the step that starts after
        `tokens` training tokens: --batch-size, or the --batch-ramp's stage there -- a multiple
        of --batch-start, growing linearly with the tokens (8 to 32 over 6M: 8 up to 2M, 16 up
        to 4M, 24 up to 6M, then 32). A function of the tokens alone, so a resumed run draws
        the same batches."""
        if not self.batch_ramp or tokens >= self.batch_ramp:
            return self.batch_size
        start = self.batch_start  # below the ramp's end the growth stays under batch - start
        return start + int((self.batch_size - start) * tokens / self.batch_ramp) // start * start

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrainError(f"invalid training config: {msg}")

        for name in ("batch_size", "seq_len", "grad_accum"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.batch_ramp >= 0, f"batch_ramp must be >= 0, got {self.batch_ramp}")
        if self.batch_ramp or self.batch_start is not None:
            need(
                self.batch_ramp > 0 and self.batch_start is not None,
                "--batch-ramp (tokens) and --batch-start (sequences) go together",
            )
            need(
                1 <= self.batch_start <= self.batch_size,
                f"batch_start must be in [1, batch_size={self.batch_size}], got {self.batch_start}",
            )
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.router_lr >= 0, f"router_lr must be >= 0, got {self.router_lr}")
        need(self.expert_lr > 0, f"expert_lr must be > 0, got {self.expert_lr}")
        need(
            self.expert_weight_decay is None or self.expert_weight_decay >= 0,
            f"expert_weight_decay must be >= 0, got {self.expert_weight_decay}",
        )
        need(self.gamma_tokens >= 0, f"gamma_tokens must be >= 0, got {self.gamma_tokens}")
        need(
            self.gamma_decay is None or (self.gamma_decay >= 0 and self.schedule == "wsd"),
            f"gamma_decay must be >= 0 and needs the wsd schedule, got {self.gamma_decay} "
            f"with {self.schedule}",
        )
        need(
            self.parallel in ("fsdp", "ddp"), f"parallel must be fsdp or ddp, got {self.parallel!r}"
        )
        need(self.ep >= 1, f"ep must be >= 1, got {self.ep}")
        need(
            self.optimizer in ("adamw", "muon"),
            f"optimizer must be adamw or muon, got {self.optimizer!r}",
        )
        need(
            self.optim_states in OPTIMIZER_STATES,
            f"optim_states must be {' or '.join(OPTIMIZER_STATES)}, got {self.optim_states!r}",
        )
        need(
            self.optim_states == "fp32" or self.optimizer == "adamw",
            f"--optim-states bf16 is for --optimizer adamw, not {self.optimizer}",
        )
        need(
            self.expert_beta2 is None or 0 <= self.expert_beta2 < 1,
            f"expert_beta2 must be in [0, 1), got {self.expert_beta2}",
        )
        beta2 = max(self.beta2, self.expert_beta2 or 0.0)
        need(
            self.optim_states == "fp32" or beta2 <= MAX_BF16_BETA2,
            f"--optim-states bf16 needs --beta2 <= {MAX_BF16_BETA2} (got {beta2}): smaller "
            "updates to the second moment round away in bf16",
        )
        need(
            self.schedule in ("cosine", "wsd"),
            f"schedule must be cosine or wsd, got {self.schedule!r}",
        )
        need(
            self.dtype in ("auto", "bf16", "fp32"),
            f"dtype must be auto, bf16 or fp32, got {self.dtype!r}",
        )
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(0 < self.decay_frac <= 1, "decay_frac must be in (0, 1]")
        need(
            self.decay_shape in DECAY_SHAPES,
            f"decay_shape must be linear or sqrt, got {self.decay_shape!r}",
        )
        need(self.keep_every >= 0, f"keep_every must be >= 0, got {self.keep_every}")
        need(
            not (self.resume and self.decay_from),
            "--decay-from starts a new run (a branch); --resume continues one: not both",
        )
        need(  # resume: the saved one; a branch: its checkpoint's
            self.resume
            or self.decay_from is not None
            or any(getattr(self, k) is not None for k in BUDGET),
            "give a budget: --steps, --tokens or --minutes",
        )
        for name in ("steps", "tokens", "minutes"):
            v = getattr(self, name)
            need(v is None or v > 0, f"{name} must be positive, got {v}")
        need(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")


FIELDS = config_fields(TrainConfig)
BUDGET = ("steps", "tokens", "minutes")
IDENTITY = (
    "preset",
    "model",
    "data",
    "data_dir",
    "vocab_size",
    "batch_size",
    "seq_len",
    "grad_accum",
    "batch_ramp",
    "batch_start",
    "seed",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "schedule",
    "decay_frac",
    "decay_shape",
    "optimizer",
    "weight_decay",
    "expert_weight_decay",
    "beta1",
    "beta2",
    "expert_beta2",
    "optim_states",
    "mtp_weight",
    "gamma",
    "gamma_final",
    "gamma_tokens",
    "gamma_decay",
    "alpha",
    "router_lr",
    "expert_lr",
    "indexer_warmup_steps",
    "indexer_loss_weight",
)
TrainConfig.IDENTITY = IDENTITY
# Settings added after runs were saved without them, with the value those runs trained with
# (a resumed run must go on computing what it started with, not a newer default).
LEGACY = {
    "router_lr": 1.0,
    "optim_states": "fp32",
    "expert_beta2": None,
    "decay_shape": "linear",
    "expert_lr": 1.0,
    "expert_weight_decay": None,
}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def read_config_file(path: str | Path, cls: type[RunConfig] = TrainConfig) -> dict[str, Any]:
    """A TOML or YAML file -> {field: value}, keys checked against the config class."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = tomllib.loads(text)
    except Exception as e:  # yaml/toml/json errors have no common base class
        raise TrainError(f"{path}: cannot parse ({e})") from e
    if not isinstance(raw, dict):
        raise TrainError(f"{path}: expected a table of settings at the top level")
    out, fields = {}, config_fields(cls)
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise TrainError(f"{path}: unknown setting {key!r}; known: {', '.join(fields)}")
        if value is None and "None" not in str(fields[name].type):  # JSON null, YAML ~
            raise TrainError(
                f"{path}: {key} cannot be null (leave it out for its default, "
                f"{_default(fields[name])!r})"
            )
        out[name] = value
    return out


def make_config(
    file: str | Path | None = None, cls: type[Config] = TrainConfig, **overrides: Any
) -> Config:
    """Defaults < file < overrides (None values in overrides mean 'not given')."""
    values = read_config_file(file, cls) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        tc = cls(**values)
    except TypeError as e:
        raise TrainError(f"invalid training config: {e}") from e
    tc.given = frozenset(values)
    tc.validate()
    return tc


def resume_config(tc: Config, saved: dict[str, Any] | None, flag: str = "--resume") -> Config:
    """The config a resumed run continues with: its saved one (`saved`, from the checkpoint),
    updated with what was given now (`tc.given_fields()`) where that may change. `flag`:
    what the errors name (a decay branch takes its trunk's settings the same way)."""
    cls = type(tc)
    fields = config_fields(cls)
    saved = {**LEGACY, **saved} if saved else {}
    saved = {  # not keys of other versions, nor the last launch's layout
        k: v for k, v in saved.items() if k in fields and k not in cls.LAYOUT
    }
    given = tc.given_fields()
    differ = [k for k in cls.IDENTITY if k in given and k in saved and getattr(tc, k) != saved[k]]
    if differ:
        changes = ", ".join(f"{k} {saved[k]!r} -> {getattr(tc, k)!r}" for k in differ)
        raise TrainError(
            f"{flag}: {changes} would change the run it continues (it keeps the settings the "
            "run started with); drop those flags to continue it, or start a fresh run "
            "with them: --overwrite, or a new --out"
        )
    values = {**saved, **{k: getattr(tc, k) for k in given}}
    if given & set(BUDGET):  # a new budget replaces the saved one whole, not key by key
        values.update(tc.budget().to_dict())
    values.update(out=tc.out, resume=True, overwrite=False)
    if "decay_from" in fields:  # a resumed branch continues; it does not branch again
        values["decay_from"] = None
    merged = cls(**values)
    merged.validate()
    if not merged.budget():
        raise TrainError(
            f"{flag}: {tc.out} has no saved budget; give --steps, --tokens or --minutes"
        )
    return merged
