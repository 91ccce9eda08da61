from chameleon.cli import main

main()
