"""DSV inside other libraries' models: `dsv.integrations.diffusers` (pip install 'dsv[diffusers]')."""
