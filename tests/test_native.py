"""Building the C kernels: cached per source and machine, with clear errors when they cannot be built."""

import pytest

from selfextend import native
from selfextend.errors import NativeBuildError


def test_built_once_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path))
    source = tmp_path / "twice.c"
    source.write_text("int twice(int x) { return 2 * x; }\n")
    native.load.cache_clear()
    assert native.load(source).twice(21) == 42
    built = list((tmp_path / "native").glob("twice-*.so"))
    assert len(built) == 1
    native.load.cache_clear()
    native.load(source)  # a second process: the same library, not built again
    assert list((tmp_path / "native").glob("twice-*.so")) == built
    source.write_text("int twice(int x) { return x + x; }\n")  # a new source: a new library
    native.load.cache_clear()
    assert native.load(source).twice(4) == 8 and len(list((tmp_path / "native").glob("twice-*.so"))) == 2


def test_no_compiler_and_a_failed_build_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path))
    source = tmp_path / "broken.c"
    source.write_text("int broken(void) { return }\n")
    native.load.cache_clear()
    with pytest.raises(NativeBuildError, match="(?s)building broken.c with cc failed:.*error"):
        native.load(source)
    monkeypatch.setenv("CC", "/no/such/cc")
    with pytest.raises(NativeBuildError, match=r"no C compiler \('/no/such/cc'\) to build broken.c"):
        native.load(source)
    native.load.cache_clear()


def test_applying_selfextend_on_cpu_builds_the_decode_kernel_before_the_first_step(monkeypatch):
    import selfextend
    from selfextend.attention import few_native
    from conftest import make_model

    built = []
    monkeypatch.setattr(few_native, "available", lambda: built.append(True) or True)
    model = make_model("llama")
    selfextend.apply(model, group_size=4, window_size=8, backend="reference")
    assert built == []  # another backend builds nothing
    selfextend.apply(model, group_size=4, window_size=8)
    assert built == [True]
