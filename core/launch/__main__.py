"""`python -m core.launch`: the engine's command line entry point."""

from core.launch import main

main()
