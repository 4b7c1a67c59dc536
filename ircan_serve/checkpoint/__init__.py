"""Where the checkpoint is written and checked: the manifest, export, verify and the model card.

Import the submodules (``checkpoint.manifest`` is all that serving needs; ``checkpoint.export``
and ``checkpoint.verify`` load safetensors and the data side).
"""
