import Foundation
import GemmaChatCore

@MainActor
final class ChatViewModel: ObservableObject {
    struct Line: Identifiable {
        let id = UUID()
        let speaker: String
        var text: String
    }

    @Published var bundles: [URL] = []
    @Published var selected: URL?
    @Published var status = "Copy a Core ML bundle folder into this app's Documents with Finder, then Load."
    @Published var lines: [Line] = []
    @Published var stats = ""
    @Published var busy = false
    @Published var temperature = 0.0
    let maxNewTokens = 256
    private var engine: ChatEngine?

    func refresh() {
        bundles = BundleStore.bundles()
        if selected == nil || !bundles.contains(selected!) { selected = bundles.first }
    }

    func load() async {
        guard let bundle = selected else { return }
        busy = true
        defer { busy = false }
        status = "Loading \(bundle.lastPathComponent)…"
        engine = nil
        lines = []
        stats = ""
        let started = Date()
        do {
            let opened = try await ChatEngine.open(bundle: bundle)
            engine = opened
            let m = opened.manifest
            status = String(format: "Loaded %@ in %.1f s: context %ld, prefill chunk %ld, stop ids %@",
                            bundle.lastPathComponent, Date().timeIntervalSince(started), m.maxContext, m.prefillChunk,
                            m.stopIds.map(String.init).joined(separator: ", "))
        } catch {
            status = error.localizedDescription
        }
    }

    func send(_ text: String) {
        let message = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let engine, !message.isEmpty, !busy else { return }
        busy = true
        lines.append(Line(speaker: "You", text: message))
        lines.append(Line(speaker: "Gemma", text: ""))
        let settings = SamplingSettings(temperature: Float(temperature), seed: UInt64(lines.count))
        engine.say(message, settings: settings, maxNewTokens: maxNewTokens, onText: { [weak self] piece in
            guard let self, !self.lines.isEmpty else { return }
            self.lines[self.lines.count - 1].text += piece
        }, onDone: { [weak self] result in
            guard let self else { return }
            self.busy = false
            switch result {
            case .success(let s):
                let end: String
                switch s.reason {
                case .stop: end = ""
                case .length: end = " · cut at \(self.maxNewTokens) tokens"
                case .context: end = " · context full"
                case .cancelled: end = " · stopped"
                }
                self.stats = String(format: "%.1f tokens/s · %ld tokens · context %ld/%ld · %.0f MiB",
                                    s.tokensPerSecond, s.tokens, s.position, s.maxContext, s.footprintMiB) + end
            case .failure(let error):
                self.status = error.localizedDescription
            }
        })
    }

    func stop() {
        engine?.cancel()
    }

    func reset() {
        engine?.cancel()
        engine?.reset { [weak self] error in
            self?.lines = []
            self?.stats = ""
            if let error { self?.status = error.localizedDescription }
        }
    }
}
