"""The key service's SQL store: schema, engines and migrations (SQLite embedded, PostgreSQL for replicas)."""
