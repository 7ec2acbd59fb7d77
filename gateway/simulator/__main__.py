from gateway.simulator.app import main

main()
