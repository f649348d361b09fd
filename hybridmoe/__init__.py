"""hybridmoe: run huge Mixture-of-Experts LLMs on one workstation.

    import hybridmoe
    engine = hybridmoe.load("path/to/model", device="cuda")
    for event in engine.chat([{"role": "user", "content": "Hello"}], max_tokens=64):
        if isinstance(event, hybridmoe.Text):
            print(event.text, end="")
"""
from .engine.config import GenerationConfig
from .engine.engine import Engine, load
from .engine.events import Done, Error, Event, Notice, Stats, Text
from .errors import ConfigError, ContextOverflowError, EngineBusyError, HybridMoEError, ModelFileError

__version__ = "0.1.0"
__all__ = ["load", "Engine", "GenerationConfig", "Event", "Text", "Stats", "Notice", "Error", "Done", "HybridMoEError",
           "ConfigError", "ModelFileError", "ContextOverflowError", "EngineBusyError", "__version__"]
