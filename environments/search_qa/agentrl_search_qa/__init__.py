"""`search-qa-v0`: two-hop questions over a bundled document collection, with BM25 search and fetch."""
