"""Below everything: errors, params (every default once), digests, artifact names, the lock check."""
