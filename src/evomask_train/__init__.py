"""evomask training tools: the MAE trainer (``evomask-pretrain``) and the mask demo (``evomask-demo``).

Both need the ``train`` extra (``pip install "evomask[train]"``); the console scripts check for it
first (:mod:`evomask_train.cli`).
"""
