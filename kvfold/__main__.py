from kvfold.cli import main

main()
