"""``python -m lmtrain`` (and ``torchrun -m lmtrain``) run the CLI."""

from lmtrain.cli import main

if __name__ == "__main__":
    main()
