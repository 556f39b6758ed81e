from symbiont_agent.agent import main

main()
