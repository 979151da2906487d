import os
import sys

from nanoseek.cli import main

if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: its summary names the failing rank
    from torch.distributed.elastic.multiprocessing.errors import record  # and shows its error

    main = record(main)

sys.exit(main())
