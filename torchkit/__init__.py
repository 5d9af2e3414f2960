"""The layer below both packages: what dsv and echosim share, importing neither.

    torchkit.cli           one-line command errors (exit 2 bad input, 1 failure), --traceback
    torchkit.config_cli    typed dataclasses <-> argparse flags, the project's one bridge
    torchkit.collectives   torch.distributed's single-tensor gather/scatter under this torch's name
    torchkit.launch        a module on N local processes under torchrun, the project's one launcher
    torchkit.timing        one step's GPU, wall and host time, the project's one step timer
"""
