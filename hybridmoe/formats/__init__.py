"""Reading model files: HF directories (config.json + safetensors) and GGUF."""
