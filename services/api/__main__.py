from services.api.service import main_cli

main_cli()
