from services.expert_host.service import main_cli

main_cli()
