"""Where initaudit lives: the one repository URL that the README, action.yml, the pre-commit manifest, SARIF and
`initaudit explain` all point at (a test holds them to it)."""

REPOSITORY_URL = "https://github.com/initaudit/initaudit"
# The rendered rule pages (docs/rules/NAME.md) on the default branch.
RULE_DOCS_URL = f"{REPOSITORY_URL}/blob/main/docs/rules/"
