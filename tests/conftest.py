"""Test-session setup shared by all test files."""

import os
import tempfile

# A private inductor cache per test session: compiled graphs cached by an
# earlier build of tokenmix (with other fake kernels) must not be reused.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tokenmix-inductor-"))
