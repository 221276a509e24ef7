from mvllm_sim.cli import main

main()
