"""Long-term memory: embed profiles (M_s) and enriched interactions (M_l), retrieve M_l per row.

``embeddings`` holds the backends (openai, local, hash), ``retrieval`` the FAISS search, and
``stage`` the ``persona-tune embed`` command.
"""
