"""``python -m featbank.cli``: the ``featbank`` command, for launchers that start modules
(``torchrun --nproc-per-node 8 -m featbank.cli extract DATA --out cache.h5``)."""

from featbank.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
