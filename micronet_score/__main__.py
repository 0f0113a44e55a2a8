from micronet_score.cli import main

main()
