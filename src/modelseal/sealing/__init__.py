"""Owner-side work on sealed files: seal (writer), convert, inspect/verify/rekey (operations)."""
