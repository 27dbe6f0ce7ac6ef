# nothing: the real file writes the extension description and CPack settings
