"""hybridmoe's terminal chat: streaming answers next to a live monitor of speed, memory and expert routing.

Installed as `hybridmoe_tui`; `hybridmoe chat [MODEL]` loads the model and calls hybridmoe_tui.app.run_chat(engine).
"""
