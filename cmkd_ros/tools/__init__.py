"""Command-line tools: ``cmkd`` (``cli``) and its subcommands (demo, evaluate-bag, replay,
overlay) with their progress output and pictures. Nothing here is imported by the nodes."""
