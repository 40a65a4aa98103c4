"""Source of the user's modules that the hostile CLI cases name with --model and --finetune."""
from __future__ import annotations

import textwrap

FACTORIES = textwrap.dedent('''
    import sys

    import torch
    from torch import nn

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def raises():
        raise RuntimeError("the factory broke\\n" + "and said a lot about it " * 5000)

    def exits():
        sys.exit(0)

    def not_a_model():
        return 42

    def finetune_raises(model, step):
        raise ValueError("fine-tuning broke")

    def finetune_exits(model, step):
        sys.exit(3)
''')

BROKEN_IMPORT = 'raise ImportError("this module needs a package that is not installed")\n'

EXITS_ON_IMPORT = "import sys\nsys.exit(4)\n"

#: A schedule that compresses one layer of ``cnn`` once.
SCHEDULE = ("version: 1\nlayers:\n  '2': {decomposition: tucker2, rank_selection: manual, manual_rank: [[8, 8]], "
            "force: true}\n")

#: A plugin whose decomposition takes the bundled ``svd``'s name.
CLASHING_PLUGIN = textwrap.dedent('''
    from musco_core import hookimpl
    from musco_plugins.svd import SVD

    class OtherSvd(SVD):  # a working decomposition, under a name the bundled one has
        name = "svd"

    @hookimpl
    def musco_register_decompositions():
        return [OtherSvd]
''')

BROKEN_PLUGIN = 'raise ImportError("hostile_broken_plugin needs a missing dependency")\n'
