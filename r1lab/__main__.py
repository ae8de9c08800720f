from r1lab.cli import main

main()
