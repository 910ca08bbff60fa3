"""``python -m training.translation``: see :mod:`training.translation.train`."""

from training.translation.train import main

main()
