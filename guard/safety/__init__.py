"""Safety rules: text normalisation, patterns, embeddings, trained classifiers, guard models."""
