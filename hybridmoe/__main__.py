"""`python -m hybridmoe ARGS` is `hybridmoe ARGS`."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before main() could catch it
    sys.exit(130)

sys.exit(main())
