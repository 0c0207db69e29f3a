import SwiftUI

@main
struct GemmaChatApp: App {
    @StateObject private var model = ChatViewModel()

    var body: some Scene {
        WindowGroup {
            ChatView(model: model)
        }
    }
}
