"""The frozen-feature cache."""


def test_feature_cache_key_depends_on_precision_and_library_versions(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from engine import features, results

    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    spec = SimpleNamespace(key="m", weights="builtin", input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    samples = [(str(image), 0)]
    fp32 = features.cache_key(spec, None, samples, "fp32")
    assert fp32 != features.cache_key(spec, None, samples, "bf16")
    real = results.package_versions()
    monkeypatch.setattr(results, "package_versions", lambda: {**real, "timm": "0.0.1"})
    assert features.cache_key(spec, None, samples, "fp32") != fp32
