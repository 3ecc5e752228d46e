"""The host agent ("dkeycache"): fetches granted keys from the key service, keeps them in locked,
non-dumpable memory, and hands them to local processes over a unix socket."""
