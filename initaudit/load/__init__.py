"""Loading: one module per format, each returning a `Loaded` (source.py); `dispatch.load` picks the loader and
`paths` says what a MODEL argument is."""
