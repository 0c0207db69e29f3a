import SwiftUI

struct ChatView: View {
    @ObservedObject var model: ChatViewModel
    @State private var draft = ""

    var body: some View {
        NavigationStack {
            VStack(alignment: .leading, spacing: 8) {
                HStack {
                    Picker("Bundle", selection: $model.selected) {
                        ForEach(model.bundles, id: \.self) { url in
                            Text(url.lastPathComponent).tag(Optional(url))
                        }
                    }
                    Button("Refresh") { model.refresh() }
                    Button("Load") { Task { await model.load() } }
                        .disabled(model.busy || model.selected == nil)
                }
                HStack {
                    Text("Temperature")
                    Slider(value: $model.temperature, in: 0...1.5, step: 0.1)
                    Text(String(format: "%.1f", model.temperature)).monospacedDigit()
                }
                Text(model.status).font(.footnote).foregroundStyle(.secondary)
                ScrollViewReader { proxy in
                    ScrollView {
                        LazyVStack(alignment: .leading, spacing: 10) {
                            ForEach(model.lines) { line in
                                Text("\(line.speaker): \(line.text)")
                                    .textSelection(.enabled)
                                    .id(line.id)
                            }
                        }
                    }
                    .onChange(of: model.lines.last?.text) { _, _ in
                        if let id = model.lines.last?.id { proxy.scrollTo(id, anchor: .bottom) }
                    }
                }
                Text(model.stats).font(.caption).monospacedDigit()
                HStack {
                    TextField("Message", text: $draft, axis: .vertical)
                        .textFieldStyle(.roundedBorder)
                        .lineLimit(1...4)
                    Button("Send") {
                        model.send(draft)
                        draft = ""
                    }
                    .disabled(model.busy)
                    Button("Stop") { model.stop() }
                    Button("Reset") { model.reset() }
                }
            }
            .padding()
            .navigationTitle("Gemma 3")
            .onAppear { model.refresh() }
        }
    }
}
