"""`python -m initaudit.cli`."""

from initaudit.cli.main import main

main()
