"""Development tools shipped with the package: a Coinbase-compatible price stub."""
