import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import gguf_helpers as H  # noqa: E402

needs_llama = pytest.mark.skipif(not H.HAVE_LLAMA, reason="llama-cpp-python is not installed")


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory):
    """(family, kind) -> (HF directory, GGUF path). kind: f32 (our converter), q8_0 / q4_k_m (llama.cpp's
    quantizer on that f32 file). Built once per session on first use."""
    from hybridmoe.models.convert import convert
    built: dict = {}

    def get(family: str, kind: str = "f32") -> tuple[Path, Path]:
        if (family, kind) not in built:
            if (family, "f32") not in built:
                root = tmp_path_factory.mktemp(family)
                hf = H.build_hf(family, root / "hf")
                built[family, "f32"] = hf, convert(hf, root / "f32.gguf", "f32", progress=False)
            hf, f32 = built[family, "f32"]
            if kind != "f32":
                if not H.HAVE_LLAMA:
                    pytest.skip("llama-cpp-python is not installed")
                built[family, kind] = hf, H.llama_quantize(f32, f32.with_name(f"{kind}.gguf"), kind)
        return built[family, kind]

    return get
