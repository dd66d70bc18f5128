"""hypothesis's `given`, `settings`, `HealthCheck` and `strategies` when it is installed (the `test`
extra); otherwise stand-ins that mark each property-based test skipped, so a module that mixes such
tests with plain ones still runs the plain ones on `pip install -e . pytest`."""

from __future__ import annotations

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    import pytest

    class _Anything:
        """Absorbs the strategy expressions evaluated at import time (`st.lists(...) | st.none()`)."""

        def __getattr__(self, name: str) -> _Anything:
            return self

        def __call__(self, *args, **kwargs) -> _Anything:
            return self

        def __or__(self, other) -> _Anything:
            return self

        __ror__ = __or__

    st = HealthCheck = _Anything()

    def settings(*args, **kwargs):
        return lambda test: test

    def given(*args, **kwargs):
        return pytest.mark.skip(reason="property-based test: needs hypothesis (pip install -e '.[test]')")


__all__ = ["HealthCheck", "given", "settings", "st"]
