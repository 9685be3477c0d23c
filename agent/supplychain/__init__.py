"""The model supply chain: Uptane-style verification on python-tuf, and the model envelope.

Sans-I/O core: ``envelope`` (STREAM ChaCha20-Poly1305 segments), ``grants`` (HPKE key grants),
``identity`` (device keys), ``reports`` (signed device reports), ``targets`` (target paths and
signed ``custom`` data), ``errors``. Device side: ``fetcher`` (``repo://`` for ngclient),
``store`` (the state directory), ``verify`` (director + image verification, decrypt in memory).
This package imports nothing from the rest of the project except ``schema``, ``modelcard`` and
``atomicio``.
"""
