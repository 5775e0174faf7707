from subledger.app.cli import main

main()
