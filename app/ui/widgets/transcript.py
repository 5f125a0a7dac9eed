"""The scrolling message list of a tab, and the keyboard navigation over it that chat and scene tabs share."""

from __future__ import annotations

from textual.containers import VerticalScroll

from app.ui.widgets.chat_input import ChatInput
from app.ui.widgets.message_view import MessageView


class Transcript(VerticalScroll):
    """The scrolling message list. It remembers whether the reader is at the newest message (`following`),
    so a reply finished while the tab was hidden, or a resize, still ends with the newest message and its
    figures in view; a reader who scrolled up stays where they are."""

    following = True

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self.size.height and self.is_on_screen and self.max_scroll_y > 0:
            self.following = new_value >= self.max_scroll_y - 2

    def show_newest(self) -> None:
        """Scroll to the end once the layout is up to date (a hidden tab has no size before that)."""
        self.following = True
        self.call_after_refresh(self.scroll_end, animate=False, immediate=True)

    def keep_up(self) -> None:
        """After the content or the size changed: stay at the end if the reader was there."""
        if self.following:
            self.show_newest()

    def on_resize(self) -> None:
        self.keep_up()


class TranscriptNavigation:
    """What chat and scene tabs share: their transcript and message box, and keyboard focus over
    the message views (↑/↓ between messages). The tab provides `message_views()`.
    """

    @property
    def transcript(self) -> Transcript:
        return self.query_one(".transcript", Transcript)

    @property
    def composer(self) -> ChatInput:
        return self.query_one(ChatInput)

    restore_scroll: float | None = None  # a saved scroll position, applied when the tab is next shown

    def show_in_view(self) -> None:
        """The tab came on screen: back to its saved scroll position, or to the newest message if following."""
        if not self.query(".transcript"):  # being closed
            return
        transcript = self.transcript
        if self.restore_scroll is not None:
            y, self.restore_scroll = self.restore_scroll, None
            transcript.following = False
            transcript.call_after_refresh(transcript.scroll_to, y=y, animate=False, immediate=True)
        else:
            transcript.keep_up()

    def scroll_record(self) -> float | None:
        """What to save: the scroll position, or None when the reader is at the newest message."""
        if self.restore_scroll is not None:
            return self.restore_scroll
        found = self.query(".transcript")
        transcript = found.first() if found else None
        return None if transcript is None or transcript.following else float(transcript.scroll_y)

    def focus_message(self, index: int) -> bool:
        views = [v for v in self.message_views() if v.message_id is not None]
        if not views:
            return False
        view = views[index]
        view.focus()
        view.scroll_visible(animate=False)
        return True

    def move_focus_from(self, view: MessageView, step: int) -> None:
        views = [v for v in self.message_views() if v.message_id is not None]
        if view not in views:
            self.composer.focus()
            return
        i = views.index(view) + step
        if i >= len(views):
            self.composer.focus()
        elif i >= 0:
            views[i].focus()
            views[i].scroll_visible(animate=False)

    def focused_message(self) -> MessageView | None:
        focused = self.app.focused
        return focused if isinstance(focused, MessageView) and focused in self.message_views() else None

    def last_reply(self) -> MessageView | None:
        replies = [v for v in self.message_views() if v.role == "assistant"]
        return replies[-1] if replies else None
