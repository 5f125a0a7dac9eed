"""The Textual app (`parley` with no subcommand).

- `app.py`: `ParleyApp` and `run_app(args)`; starts the engine thread and turns its events into messages.
- `messages.py`: one Textual message carries every engine event (the chat screen routes it to its tab),
  plus the app's own (past-tense facts).
- `screens/`: one screen per module: ChatScreen (main), HelpScreen, PersonaEditorScreen, ConversationsScreen,
  ConfirmScreen, ImportCardScreen, ExportCardScreen, NewSceneScreen, ScenesScreen.
- `widgets/`: one widget per module: PersonaList, RamGauge, ChatPane, SceneTab, MessageView, Transcript, ChatInput.
- `palette.py`: the command palette provider (every action).
- `catalog_reads.py`: the catalog reads the UI needs, run on Textual thread workers (never the UI thread).
- `parley.tcss`: the one stylesheet.

The UI imports only app.engine.commands/events/worker, app.catalog, app.personas, app.paths and
app.errors (tests/test_ui_layers.py); it never imports MLX.
"""
