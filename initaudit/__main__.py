"""`python -m initaudit` (as torchrun runs it: `torchrun ... -m initaudit check --distributed CKPT`)."""

from initaudit.cli.main import main

if __name__ == "__main__":
    main()
