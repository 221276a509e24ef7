from mvllmctl.cli import main

main()
