from mvllmd.cli import main

main()
