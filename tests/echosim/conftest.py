import pytest


@pytest.fixture(autouse=True)
def user_folder(tmp_path, monkeypatch):
    """An empty echosim user folder ($XDG_CONFIG_HOME/echosim), so that what `echosim calibrate`
    wrote on this machine changes no test's numbers, and no test writes there."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "echosim"
