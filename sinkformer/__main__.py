from sinkformer.cli import main

main()
