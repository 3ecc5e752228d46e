"""The key service ("dkeyserver"): registers model keys, grants hosts, releases keys, audits everything."""
